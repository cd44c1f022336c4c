"""Base models: loading (Hub id, folder, single file), single-file export, schedulers,
and the tiny random-weight model the tests and benchmarks write. Worker side."""
