"""Rule files (data) shipped with derive; see the README beside this file."""
