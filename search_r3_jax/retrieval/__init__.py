"""The retrieval side: the host index, the stage-2 environment, metrics and
evaluation. Imports the core and data only."""
