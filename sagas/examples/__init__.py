"""Example sagas shipped with the product; each module defines one."""
