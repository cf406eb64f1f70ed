from compose_parts import parts  # noqa: F401  (the session fixture of tiny parts)
