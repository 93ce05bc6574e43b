"""`refit`, the command line: above both training and serving (it trains, serves nothing, and runs workers)."""
