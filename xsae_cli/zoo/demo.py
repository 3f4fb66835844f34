def demo_status():
    return {}
