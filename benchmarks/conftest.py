def pytest_addoption(parser):
    parser.addoption("--param-set", default="resnet50", help="resnet50, transformer350m, many_small or tiny")
