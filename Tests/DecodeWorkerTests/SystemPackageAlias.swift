import SystemPackage

typealias SystemPackageFD = SystemPackage.FileDescriptor
