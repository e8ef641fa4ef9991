"""moebench's built-in plugins, registered through the `moebench` entry-point group."""
