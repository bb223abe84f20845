"""maws_train."""
