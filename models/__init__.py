"""Architecture builders and the recipes that train clean and backdoored models (needs the `torch` extra)."""
