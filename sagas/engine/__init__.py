"""The execution engine: RQ jobs that run one step attempt each."""
