"""The API gateway: one HTTP entry point to every service (`meshd up --api-listen`)."""
