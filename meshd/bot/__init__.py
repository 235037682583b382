"""The chat bot: query and operate the mesh from Slack (docs/bot.md)."""
