"""What the tests share: databases, the app's environment, the example district, a real stack,
a Clever-shaped server, generated rosters. Imported by the tests; never imports a test module."""
