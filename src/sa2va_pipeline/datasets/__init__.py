"""Custom Kedro datasets of this project (one module per dataset)."""
