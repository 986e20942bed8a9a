"""recaption"""
