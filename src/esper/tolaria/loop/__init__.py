"""esper.tolaria.loop"""
