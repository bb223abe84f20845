"""maws_eval."""
