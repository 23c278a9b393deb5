"""`tolaria bench`: every performance figure, each a ratio against a same-process baseline where one exists."""
