"""Example applications and their migrations, used by `safemigrate demo` and the docs."""
