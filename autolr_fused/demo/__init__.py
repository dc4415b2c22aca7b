"""The demo: every method side by side on scikit-learn's 8x8 digits (shipped with scikit-learn)."""
