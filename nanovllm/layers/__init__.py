"""Building blocks written once against the Python array API standard (2024.12)."""
