"""Face detection (OpenCV Haar cascades) and the face / person / background masks.
Runs in workers and in the bot's photo helper process, never in the bot process."""
