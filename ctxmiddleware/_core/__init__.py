"""The context core: no web framework is imported here."""
