"""amprune"""
