"""`python -m compiler.capi --cflags --libs`: the flags to build a C or C++ program against quantvm.h."""

import sys

from compiler.capi.flags import main

sys.exit(main())
