"""A tiny X client for the browser tests, run as a subprocess on ``$DISPLAY``.

``xclient.py paint '#3366cc'`` sets the root window's background colour and exits (the X server
must run with ``-noreset`` to keep it once the client is gone).

``xclient.py pattern '#cc3333'`` draws a known picture on the root window over its background:
rectangles of fixed colours (the first one of that colour) and a band of stripes in many colours,
and exits.

``xclient.py record '#22aa44'`` maps a window of that colour over the whole screen, gives it the
input focus itself (there is no window manager to do it), prints ``{"type": "ready", ...}`` and
then one JSON line per key or button press it receives, until it is killed.
"""

from __future__ import annotations

import json
import sys

from Xlib import XK, X, display


def rgb(text: str) -> tuple[int, int, int]:
    """``#rrggbb`` as three 0-255 integers."""
    value = int(text.removeprefix("#"), 16)
    return value >> 16, (value >> 8) & 0xFF, value & 0xFF


def pixel(screen, colour: str) -> int:  # type: ignore[no-untyped-def]
    r, g, b = rgb(colour)
    return screen.default_colormap.alloc_color(r * 257, g * 257, b * 257).pixel  # type: ignore[no-any-return]


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def keysym_name(keysym: int) -> str:
    """The X name of a keysym (``q``, ``A``, ``Return``), or its hex value."""
    for name in dir(XK):
        if name.startswith("XK_") and getattr(XK, name) == keysym:
            return name[3:]
    return hex(keysym)


def paint(d: display.Display, colour: str) -> None:
    screen = d.screen()
    screen.root.change_attributes(background_pixel=pixel(screen, colour))
    screen.root.clear_area(0, 0, 0, 0)
    d.sync()


#: What ``pattern`` draws besides its first rectangle: (x, y, width, height, colour).
PATTERN = [
    (20, 20, 100, 60, "#22aa44"),
    (40, 150, 60, 60, "#ffffff"),
]


def pattern(d: display.Display, colour: str) -> None:
    screen = d.screen()
    root = screen.root
    rectangles = [(180, 40, 120, 80, colour), *PATTERN]
    for x, y, width, height, fill in rectangles:
        root.fill_rectangle(root.create_gc(foreground=pixel(screen, fill)), x, y, width, height)
    # Stripes of many colours, so that the picture is not all flat fills.
    for i in range(64):
        fill = f"#{(i * 4) % 256:02x}{(255 - i * 4) % 256:02x}{(i * 37) % 256:02x}"
        root.fill_rectangle(root.create_gc(foreground=pixel(screen, fill)), 120 + i * 3, 150, 3, 70)
    d.sync()


def record(d: display.Display, colour: str) -> None:
    screen = d.screen()
    width, height = screen.width_in_pixels, screen.height_in_pixels
    window = screen.root.create_window(
        0,
        0,
        width,
        height,
        0,
        screen.root_depth,
        X.InputOutput,
        X.CopyFromParent,
        background_pixel=pixel(screen, colour),
        override_redirect=True,
        event_mask=X.KeyPressMask | X.ButtonPressMask | X.StructureNotifyMask | X.FocusChangeMask,
    )
    window.map()
    while d.next_event().type != X.MapNotify:
        pass
    d.set_input_focus(window, X.RevertToPointerRoot, X.CurrentTime)
    d.sync()
    focus = d.get_input_focus().focus
    emit(type="ready", width=width, height=height, focused=focus == window)
    while True:
        event = d.next_event()
        if event.type == X.KeyPress:
            shifted = 1 if event.state & X.ShiftMask else 0
            keysym = d.keycode_to_keysym(event.detail, shifted)
            emit(type="key", keycode=event.detail, keysym=keysym_name(keysym))
        elif event.type == X.ButtonPress:
            emit(type="button", button=event.detail, x=event.event_x, y=event.event_y)


def main(argv: list[str]) -> int:
    command, colour = argv[1], argv[2]
    d = display.Display()
    if command == "paint":
        paint(d, colour)
    elif command == "pattern":
        pattern(d, colour)
    elif command == "record":
        record(d, colour)
    else:
        print(f"unknown command {command!r}", file=sys.stderr)
        return 2
    d.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
