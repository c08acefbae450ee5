"""The networks as pure functions: configs, `init_params`, `param_axes`, `apply`. Imports nothing above it."""
