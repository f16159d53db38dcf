//! Window export / import (not yet).
