"""Front doors: one thin translator per protocol between its wire format and the chat session."""
