"""The `p2pnode` command line (click)."""
