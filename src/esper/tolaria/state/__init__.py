"""esper.tolaria.state.capture"""
