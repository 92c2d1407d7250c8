"""The FashionNet pipeline: Prefect flows for each DVC stage, and the `fashionnet` CLI."""
