"""maws_data."""
