"""Deprecated name of ``jobs/report.py`` (accepted until 0.3, with a deprecation message): runs the same stage."""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
