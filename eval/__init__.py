"""The labelled evaluation set for the knowledge-base retrieval and the `make eval` runner."""
