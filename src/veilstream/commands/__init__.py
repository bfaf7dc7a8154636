"""The `veilstream` commands: each builds a source, the pipeline and its sinks, and runs them."""
