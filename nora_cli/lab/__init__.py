"""The paper's theory lab (`nora factorize`)."""
