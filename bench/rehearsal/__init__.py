"""The full-size rehearsal of the paper path (bench/rehearsal.sh)."""
