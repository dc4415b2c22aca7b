"""Step-size controllers: the papers' learning-rate rules, apart from any parameter memory."""
