#include "shim/session.h"

int main(int argc, char** argv) { return shimlet::session::main(argc, argv); }
