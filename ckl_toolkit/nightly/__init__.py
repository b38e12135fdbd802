"""The nightly refresh contract: document sources, the ledger, the run plan, versions, exit codes."""
