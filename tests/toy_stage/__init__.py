"""A toy stage added through the registry (tests/integration/test_stage_registry.py): it is not part
of the package, and reaches the CLI through ``$RETRIEVAL_STAGES`` or ``registry.STAGE_MODULES``."""
