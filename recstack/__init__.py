"""recstack: command line and settings shared by the offline and online sides."""
