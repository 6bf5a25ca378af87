"""The test suite as a package: helpers are imported as ``tests.<dir>.<module>``.

``btx_megatron`` is imported first so that its start-up (the CPU compatibility layer's
import-time part) runs before any test module imports ``megatron.core``."""

import btx_megatron  # noqa: F401
