"""esper.tamiyo"""
