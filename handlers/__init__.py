"""TorchServe handlers (one class per module, as TorchServe requires)."""
