"""HTTP API (FastAPI): thin routes over ``ranker.service``."""
