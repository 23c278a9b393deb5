"""esper.tolaria.recovery"""
