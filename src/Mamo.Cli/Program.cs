using Mamo.Cli;

return MamoRoot.Create().Parse(args).Invoke();
