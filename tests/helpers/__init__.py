"""Helpers shared by the test packages: browsers, page readers, a stand-in second device."""
