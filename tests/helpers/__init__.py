"""Helpers shared by the test packages (browsers, page readers)."""
