"""Pipeline stages: each module holds a Ray-free core class; serve/app.py wraps them."""
