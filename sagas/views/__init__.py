"""The console's pages that belong to no model: dashboard, inbox, breakers and locks."""
